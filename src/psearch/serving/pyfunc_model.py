"""The code file of the logged MLflow pyfunc model (MLflow 3 "models from code").

``psearch.serving.pyfunc.log_model`` passes this file's path as ``python_model``: MLflow copies
the file into the logged model and, on ``mlflow.pyfunc.load_model``, runs it to get the model
object, instead of unpickling one. The file only names the installed package's class, so what
runs is the installed ``psearch``'s code and the logged model holds no Python object at all;
the weights come from the ``checkpoint`` artifact, read with ``weights_only``
(``PersonSearchModel.load_context`` -> ``psearch.models.io.load_model``).

Not meant to be imported by the package: importing it sets MLflow's "model of this code file".
"""

from mlflow.models import set_model

from psearch.serving.pyfunc import PersonSearchModel

set_model(PersonSearchModel())
