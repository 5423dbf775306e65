"""The bundle's files, installed as the package data `builder.templates`: Jinja templates of the card and
requirements, and runtime/, the Python that ships inside bundles (copied byte for byte) and the equivalence script."""
