"""The Jinja templates of the bundle files, installed as the package data `builder.templates`."""
