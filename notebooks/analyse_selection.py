# Databricks notebook source
# MAGIC %md
# MAGIC # Analyse a selection
# MAGIC Per-source retention, quality distributions with thresholds, and examples kept and dropped at the
# MAGIC threshold for one selection run (the newest when `selection_run` is empty).

# COMMAND ----------

dbutils.widgets.text("config", "conf/databricks.yml", "Config file")
dbutils.widgets.text("catalog", "main", "Catalog")
dbutils.widgets.text("schema", "mira", "Schema")
dbutils.widgets.text("selection_run", "", "Selection run (empty: newest)")

# COMMAND ----------

from pyspark.sql import functions as F

from mira_spark.notebook_support import latest_selection_run, open_context

ctx = open_context(dbutils.widgets.get("config"), dbutils.widgets.get("catalog"), dbutils.widgets.get("schema"))
run_id = dbutils.widgets.get("selection_run") or latest_selection_run(ctx)
print(f"selection run: {run_id}")
summary = ctx.spark.table("selection_summary").filter(F.col("selection_run") == run_id)
display(summary.orderBy("group_id", "source"))

# COMMAND ----------

# MAGIC %md Retention per source and its threshold.

# COMMAND ----------

thresholds = ctx.tables.read("thresholds").filter(F.col("selection_run") == run_id)
display(thresholds.withColumn("kept_token_fraction", F.col("kept_tokens") / F.col("tokens")).orderBy("source"))

# COMMAND ----------

# MAGIC %md Quality distribution per source with its threshold.

# COMMAND ----------

from mira_spark.notebook_support import quality_histograms

display(quality_histograms(ctx, run_id))

# COMMAND ----------

# MAGIC %md Examples at the threshold: the lowest-quality records kept and the highest-quality records dropped.

# COMMAND ----------

from mira_spark.notebook_support import examples_at_threshold

display(examples_at_threshold(ctx, run_id, per_source=2))
