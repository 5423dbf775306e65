"""The Python that ships inside bundles and runs without modelpack: load.py and bundle_check.py are copied byte for
byte into every bundle; equivalence.py and gguf_check.py run from this package in the verifying interpreter. None of
them imports modelpack; modelpack imports the constants they define (file names, limits, the hash function)."""
