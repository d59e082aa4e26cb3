from fieldlens.backends.triton_python_model import TritonPythonModel  # noqa: F401
