"""`make soak`: many concurrent streams over Triton gRPC, Triton HTTP and the OpenAI API against
a real server, every one checked against its single-request reference; see `__main__.py` and
docs/reliability.md."""
