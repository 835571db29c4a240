"""``msif demo``: the built-in toy world (``toy``) run end to end on local Ray (``run``)."""
