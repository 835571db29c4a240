"""``msif report``: what each page shows and the Ray pass that explains the shown documents (``build``),
and the pages themselves (``html``)."""
