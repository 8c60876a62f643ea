"""covid_tasks: the stages of the COVID-19 chest X-ray retraining pipeline.

One module per stage (``pull``, ``relabel``, ``split``, ``train``, ``finetune``, ``evaluate``,
``register``), each with one public function of the same name that takes plain inputs and
returns a small JSON-able dict. Importing the package is cheap: no TensorFlow, MLflow or pandas.
"""

from covid_tasks.config import CLASS_NAMES, Config

__all__ = ["CLASS_NAMES", "Config"]
