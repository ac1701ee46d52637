"""Unary calls on request, for load and failover tests: `python3 calls.py STUB_DIR HOST:PORT`
reads lines `N` from stdin and, for each, makes N unary calls one after the other on one
channel and prints one JSON line: per call the port of the server that answered (its
`x-server` trailer), or the status code name it failed with."""
import json
import sys

sys.path.insert(0, sys.argv[1])
import grpc  # noqa: E402
import echo_pb2  # noqa: E402
import echo_pb2_grpc  # noqa: E402


def call(stub):
    try:
        _, c = stub.Unary.with_call(echo_pb2.Msg(text="x", n=1), timeout=10)
        return dict(c.trailing_metadata()).get("x-server", "?")
    except grpc.RpcError as e:
        return e.code().name


def main():
    with grpc.insecure_channel(sys.argv[2]) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        print("READY", flush=True)
        for line in sys.stdin:
            n = int(line)
            print(json.dumps([call(stub) for _ in range(n)]), flush=True)


if __name__ == "__main__":
    main()
