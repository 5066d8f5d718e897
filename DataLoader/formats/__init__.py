"""Dataset readers, one file per format as distributed: each reads a split's image list, labels, classes and
boxes (or masks) and returns ``(image_root, items, classes)`` (``annotations.Item`` records); annotations.py
and matlab.py hold what the readers share."""
