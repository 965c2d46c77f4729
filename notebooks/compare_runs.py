# Databricks notebook source
# MAGIC %md
# MAGIC # Compare selection runs
# MAGIC Runs side by side from MLflow: config differences, kept tokens, retention per source. The same as
# MAGIC `mira-spark compare`.

# COMMAND ----------

dbutils.widgets.text("config", "conf/databricks.yml", "Config file")
dbutils.widgets.text("catalog", "main", "Catalog")
dbutils.widgets.text("schema", "mira", "Schema")
dbutils.widgets.text("last", "5", "How many recent runs")

# COMMAND ----------

from mira_spark.compare import compare_table, selection_runs
from mira_spark.notebook_support import load_notebook_config

cfg = load_notebook_config(dbutils.widgets.get("config"), dbutils.widgets.get("catalog"),
                           dbutils.widgets.get("schema"))
runs = selection_runs(cfg, last=int(dbutils.widgets.get("last")))
frames = compare_table(runs) if len(runs) else {}
for title, frame in frames.items():
    print(title)
    display(frame.reset_index(names="key"))
