"""The activity model: its definition (``tracker``, imports TensorFlow) and its runtime.

Import ``activity_model.runtime`` to run an exported SavedModel; ``activity_model.tracker`` is for
building and training one. Code that needs TensorFlow itself gets it from
``activity_model.tensorflow_import.import_tensorflow``, which keeps its log quiet unless debugging.
"""
