"""The cascade and the ``flare23 segment`` command (METHOD.md section 5)."""
