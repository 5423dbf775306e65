"""The Jinja templates of the bundle's card and requirements, installed as the package data `builder.templates`."""
