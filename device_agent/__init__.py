"""The device agent: runs on the wearable or gateway."""
