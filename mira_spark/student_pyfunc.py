"""MLflow pyfunc wrappers of a student: vector in (registered) and text in (embeds first).

Kept apart from `students.py` so that Spark workers scoring with plain numpy never import MLflow.
"""
from __future__ import annotations

import warnings

import numpy as np
from mlflow.pyfunc import PythonModel

# The signature is set explicitly at logging time; MLflow's hint about type-hint inference does not apply.
warnings.filterwarnings("ignore", message=".*Add type hints to the `predict` method.*")

from mira_spark.students import StudentWeights

WEIGHTS_ARTIFACT = "student"



def _output_frame(student: StudentWeights, predictions: np.ndarray):
    import pandas as pd

    out = pd.DataFrame(predictions.astype(np.float64), columns=student.dims)
    out["quality"] = student.quality(predictions)
    return out


class EmbeddingStudentModel(PythonModel):
    """pyfunc: a `vector` column (the record embedding) -> one column per anchor dimension, plus `quality`."""

    def load_context(self, context) -> None:
        with open(context.artifacts[WEIGHTS_ARTIFACT], encoding="utf-8") as handle:
            self.student = StudentWeights.from_json(handle.read())

    def predict(self, context, model_input, params=None):
        vectors = np.stack([np.asarray(v, dtype=np.float32) for v in model_input["vector"]])
        return _output_frame(self.student, self.student.predict(vectors))


class TextStudentModel(EmbeddingStudentModel):
    """pyfunc: a `text` column -> the same outputs; embeds with the student's embedding model first."""

    def load_context(self, context) -> None:
        super().load_context(context)
        from mira_spark.embed import load_model, model_location
        from mira_spark.config import EmbedConf

        meta = self.student.meta
        conf = EmbedConf(model=meta.get("embed_model", "default"),
                         max_seq_length=int(meta.get("max_seq_length", 256)))
        self.batch_size = int(meta.get("batch_size", 64))
        self.encoder = load_model(model_location(conf), "cpu", conf.max_seq_length, offline=True)

    def predict(self, context, model_input, params=None):
        texts = [str(t) for t in model_input["text"]]
        vectors = self.encoder.encode(texts, batch_size=self.batch_size, normalize_embeddings=True,
                                      convert_to_numpy=True, show_progress_bar=False)
        return _output_frame(self.student, self.student.predict(np.asarray(vectors, dtype=np.float32)))


def signatures(student: StudentWeights):
    """(vector-in signature, text-in signature), outputs included."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, DataType, Schema

    outputs = Schema([ColSpec(DataType.double, d) for d in student.dims] + [ColSpec(DataType.double, "quality")])
    vector_in = Schema([ColSpec(Array(DataType.float), "vector")])
    text_in = Schema([ColSpec(DataType.string, "text")])
    return ModelSignature(inputs=vector_in, outputs=outputs), ModelSignature(inputs=text_in, outputs=outputs)
