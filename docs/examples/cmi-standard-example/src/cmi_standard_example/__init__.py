"""An example cmi-sdk standard plugin: a purchase receipt."""
