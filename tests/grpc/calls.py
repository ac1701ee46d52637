"""Unary calls on request, for load and failover tests: `python3 calls.py STUB_DIR HOST:PORT`
reads lines `N [T]` from stdin and, for each, makes N unary calls on one channel (from T
threads at once, each making its calls one after the other; T is 1 without it) and prints one
JSON line: per call the port of the server that answered (its `x-server` trailer), or the
status code name it failed with."""
import json
import sys
from concurrent.futures import ThreadPoolExecutor

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
            words = line.split()
            n, threads = int(words[0]), int(words[1]) if len(words) > 1 else 1
            if threads == 1:
                out = [call(stub) for _ in range(n)]
            else:
                with ThreadPoolExecutor(max_workers=threads) as pool:
                    out = list(pool.map(lambda _: call(stub), range(n)))
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
