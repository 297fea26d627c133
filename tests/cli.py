"""Command lines for the end-to-end tests: {flag: value} -> argv."""


def to_argv(flags: dict, extra: dict, switches=()) -> list:
    """`extra` keys may use underscores; True adds a bare switch, None / False leave a flag out."""
    merged = dict(flags)
    merged.update({k.replace("_", "-"): v for k, v in extra.items()})
    argv = list(switches)
    for k, v in merged.items():
        if v is True:
            argv.append(f"--{k}")
        elif v is not None and v is not False:
            argv += [f"--{k}", str(v)]
    return argv


def free_port() -> str:
    """A port no other process holds now: parallel test runs (and pytest-xdist workers) never collide."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])
