"""The contract both halves of the system share: topics, messages and their codec, configuration,
the MQTT transport, signing and model bundles. Nothing here knows whether it runs on a device or
centrally, and nothing here is machine learning (that is ``activity_model``)."""
