"""A gRPC client for the tests: `python3 client.py STUB_DIR HOST:PORT`; prints one JSON object
with what each call returned (messages, trailing metadata, status)."""
import json
import sys

sys.path.insert(0, sys.argv[1])
import grpc  # noqa: E402
import echo_pb2  # noqa: E402
import echo_pb2_grpc  # noqa: E402


def status(err):
    return {"code": err.code().name, "details": err.details()}


def main():
    out = {}
    with grpc.insecure_channel(sys.argv[2]) as channel:
        stub = echo_pb2_grpc.EchoStub(channel)
        reply, call = stub.Unary.with_call(
            echo_pb2.Msg(text="hello", n=41), metadata=(("x-client", "c1"),), timeout=20
        )
        out["unary"] = {
            "text": reply.text,
            "n": reply.n,
            "trailers": dict(call.trailing_metadata()),
            "code": call.code().name,
        }
        try:
            stub.Fail(echo_pb2.Msg(text="x"), timeout=20)
            out["fail"] = {"code": "OK"}
        except grpc.RpcError as e:
            out["fail"] = status(e)
        try:
            stub.Slow(echo_pb2.Msg(n=4000), timeout=20)
            out["slow"] = {"code": "OK"}
        except grpc.RpcError as e:
            out["slow"] = status(e)
        stream = stub.ServerStream(echo_pb2.Msg(text="s", n=50), timeout=20)
        out["server_stream"] = {
            "texts": [m.text for m in stream],
            "trailers": dict(stream.trailing_metadata()),
            "code": stream.code().name,
        }
        reply = stub.ClientStream(
            iter([echo_pb2.Msg(text=f"c{i}") for i in range(20)]), timeout=20
        )
        out["client_stream"] = {"text": reply.text, "n": reply.n}
        big = "y" * 100000
        replies = stub.Bidi(
            iter([echo_pb2.Msg(text=f"{i}-{big}", n=i) for i in range(200)]), timeout=60
        )
        got = [(m.text, m.n) for m in replies]
        out["bidi"] = {
            "count": len(got),
            "ok": all(t == f"{i}-{big}"[::-1] and n == 2 * i for i, (t, n) in enumerate(got)),
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
