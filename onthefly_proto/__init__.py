"""Generated gRPC/protobuf stubs for the OnTheFly wire contract (proto/onthefly_proto/onthefly.proto).

Written by `make proto`; never edit the *_pb2* files by hand. `make check-proto` fails on drift.
"""
