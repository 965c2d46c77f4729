# Databricks notebook source
# MAGIC %md
# MAGIC # Explore source groups
# MAGIC How the `group` stage clustered the sources: group membership, each source's similarity to its group
# MAGIC centroid, and the source-by-source similarity matrix. Set the widgets to the run's catalog, schema and config.

# COMMAND ----------

dbutils.widgets.text("config", "conf/databricks.yml", "Config file")
dbutils.widgets.text("catalog", "main", "Catalog")
dbutils.widgets.text("schema", "mira", "Schema")

# COMMAND ----------

from pyspark.sql import functions as F

from mira_spark.notebook_support import open_context

ctx = open_context(dbutils.widgets.get("config"), dbutils.widgets.get("catalog"), dbutils.widgets.get("schema"))
groups = ctx.tables.read("source_groups")
display(groups.orderBy("group_id", F.desc("similarity")))

# COMMAND ----------

# MAGIC %md Sources per group, with records and tokens.

# COMMAND ----------

records = ctx.tables.read("records").groupBy("source").agg(F.count(F.lit(1)).alias("records"),
                                                           F.sum("n_tokens").alias("tokens"))
by_group = groups.join(records, "source").groupBy("group_id").agg(
    F.collect_list("source").alias("sources"), F.sum("records").alias("records"), F.sum("tokens").alias("tokens"))
display(by_group.orderBy("group_id"))

# COMMAND ----------

# MAGIC %md Source-by-source cosine similarity of the sampled centroids.

# COMMAND ----------

from mira_spark.notebook_support import similarity_heatmap

figure = similarity_heatmap(ctx)
display(figure)
