"""The activity model: its definition (``tracker``, imports TensorFlow) and its runtime.

Import ``shared.model.runtime`` to run an exported SavedModel; ``shared.model.tracker`` is for
building and training one. Code that needs TensorFlow itself gets it from
``shared.model.tensorflow_import.import_tensorflow``, which keeps its log quiet unless debugging.
"""
