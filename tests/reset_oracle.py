"""The reset specification of `cowfs.namespace.reset`, written again over trees: an oracle
independent of the namespace's code, for the state machines of tests/unit and tests/mount."""

from __future__ import annotations

from cowfs.namespace.model import FIRST_CREATED_INO

Tree = dict[tuple[bytes, ...], tuple[object, ...]]  # path -> (mode, size, nlink, detail, ino)


def view_of(tree: Tree) -> dict[tuple[bytes, ...], tuple[object, ...]]:
    """What a reset promises of each name: its kind and mode, size and content (link counts and
    inode numbers follow from the rest)."""
    return {key: (mode, size, detail) for key, (mode, size, _, detail, _) in tree.items()}


def base_home(tree: Tree, base: Tree, key: tuple[bytes, ...]) -> tuple[bytes, ...] | None:
    """The base path the mount path ``key`` shows when reset: its directory's base path and its
    name (None: its directory is not a base directory)."""
    if len(key) == 1:
        return key
    parent = tree.get(key[:-1])
    if parent is None:
        return None
    ino = parent[-1]
    assert isinstance(ino, int)
    inos = {value[-1]: path for path, value in base.items()}
    directory = None if ino >= FIRST_CREATED_INO else inos.get(ino - 2)
    return None if directory is None else directory + key[-1:]


def expected_after_reset(before: Tree, base: Tree, path: tuple[bytes, ...], origin: tuple[bytes, ...] | None) -> Tree:
    """The mount's tree after resetting ``path``, from the tree before (the namespace's, with its
    inode numbers: a base object shows as its base inode + 2) and the base's: the reset
    specification of `cowfs.namespace.reset`, written again over trees, as an independent oracle.

    A name reset shows what the base has at its base path (``origin``: its directory's base path
    and its name), or nothing; a base object that showed under it at another base path goes back
    to its own (and what shows there is reset too); a base object that now shows under it and
    showed elsewhere too (moved away, or with names made in the mount) is reset there; a file
    made in the mount keeps its other names."""
    tree = dict(before)
    base_path_of_ino = {value[-1]: key for key, value in base.items()}

    def base_path_of(value: tuple[object, ...]) -> tuple[bytes, ...] | None:
        ino = value[-1]
        assert isinstance(ino, int)
        return None if ino >= FIRST_CREATED_INO else base_path_of_ino.get(ino - 2)

    def shown_at(base_path: tuple[bytes, ...]) -> list[tuple[bytes, ...]]:
        """The mount paths that show the base object at ``base_path``."""
        if not base_path:
            return [()]
        ino = base[base_path][-1]
        assert isinstance(ino, int)
        return [key for key, value in tree.items() if value[-1] == ino + 2]

    def home(key: tuple[bytes, ...]) -> tuple[bytes, ...] | None:
        return base_home(tree, base, key)

    pending = [path]  # a name reset shows home(name) (what its directory's base has), the first ``origin``
    done: set[tuple[bytes, ...]] = set()
    while pending:
        at = pending.pop(0)
        if at in done:
            continue
        shows = origin if at == path else home(at)
        done.add(at)
        was = {key: value for key, value in tree.items() if key[: len(at)] == at}
        for key in was:
            del tree[key]
        came: set[object] = set()
        if shows is not None and (len(at) == 1 or at[:-1] in tree):
            for key, value in base.items():
                if key[: len(shows)] == shows:
                    tree[at + key[len(shows) :]] = value[:-1] + (value[-1] + 2,)  # type: ignore[operator]
                    came.add(value[-1] + 2)  # type: ignore[operator]
        for key, value in was.items():
            own = base_path_of(value)
            if own is None:
                continue  # made in the mount: its other names keep it
            if shows is None or own != shows + key[len(at) :]:
                for directory in shown_at(own[:-1]):  # moved here: it goes back to its base name
                    pending.append(directory + own[-1:])
            for other in [
                other for other, value2 in tree.items() if value2[-1] == value[-1] and other[: len(at)] != at
            ]:
                pending.append(other)  # its other names go back to the base too
        for other, value in list(tree.items()):
            if value[-1] in came and other[: len(at)] != at:
                pending.append(other)  # it showed elsewhere: that place is reset too
    return tree
