"""``har sim``: many lightweight simulated devices and their users in one process."""
