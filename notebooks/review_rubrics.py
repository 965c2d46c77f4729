# Databricks notebook source
# MAGIC %md
# MAGIC # Review rubrics
# MAGIC Each group's anchor dimensions with their support (how many sampled records raised them) and example
# MAGIC articulations. To change a rubric: export it to YAML, edit (rename, merge, delete, add dimensions), and
# MAGIC set `discover.reviewed_rubrics` to the file; the next run uses it and records that it did.

# COMMAND ----------

dbutils.widgets.text("config", "conf/databricks.yml", "Config file")
dbutils.widgets.text("catalog", "main", "Catalog")
dbutils.widgets.text("schema", "mira", "Schema")

# COMMAND ----------

from pyspark.sql import functions as F

from mira_spark.notebook_support import open_context

ctx = open_context(dbutils.widgets.get("config"), dbutils.widgets.get("catalog"), dbutils.widgets.get("schema"))
rubrics = ctx.tables.read("rubrics")
display(rubrics.select("group_id", "rubric_version", "dim_id", "name", "support", "consolidation", "origin",
                       "definition").orderBy("group_id", F.desc("support")))

# COMMAND ----------

# MAGIC %md Scale descriptors and example articulations per anchor.

# COMMAND ----------

display(rubrics.select("group_id", "name", "scale", "examples").orderBy("group_id", "name"))

# COMMAND ----------

# MAGIC %md Held-out reliability of each anchor (after `train`): masked anchors do not count in the quality score.

# COMMAND ----------

if ctx.tables.exists("dim_reliability"):
    display(ctx.tables.read("dim_reliability").orderBy("group_id", F.desc("spearman")))
