"""A tiny dataset for the scripts tests/test_data_loader.py runs with ``python -c``: in a module of its own, so
that loader workers started by spawn (macOS's default) can import it (a class of a ``-c`` script's __main__ is
out of their reach: "Can't get attribute 'Numbers' on <module '__main__' (built-in)>")."""


class Numbers:
    def __len__(self):
        return 8

    def __getitem__(self, index):
        return {"label": index}
