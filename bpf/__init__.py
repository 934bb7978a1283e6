"""routetrace's BPF C sources. This folder stays at the top of the repository and is installed as
the package `routetrace.bpf`, so `probes.BPF_DIR` finds the .c files with importlib.resources in a
checkout (editable install), a wheel and the Debian package alike."""
