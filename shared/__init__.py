"""The contract both halves of the system share: topics, messages and their codec, configuration,
data loading and the activity model. Nothing here knows whether it runs on a device or centrally."""
