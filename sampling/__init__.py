"""What generate.py shares with other code (bench/sample.py, tests): its command line
(`sampling.cli`) and its sample-folder output (`sampling.output`: the background PNG writer and
the streamed Inception features)."""
