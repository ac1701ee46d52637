"""A gRPC server for the tests: `python3 server.py STUB_DIR [PORT]` (a free port without
one), prints `PORT n` when serving. Unary calls name the port that served them in the
`x-server` trailer."""
import sys
import time
from concurrent import futures

sys.path.insert(0, sys.argv[1])
import grpc  # noqa: E402
import echo_pb2  # noqa: E402
import echo_pb2_grpc  # noqa: E402


class Echo(echo_pb2_grpc.EchoServicer):
    def Unary(self, request, context):
        md = dict(context.invocation_metadata())
        context.set_trailing_metadata(
            (("x-trailer", "t-" + request.text), ("x-server", str(PORT)))
        )
        seen = "|".join(
            f"{k}={md.get(k, '')}" for k in ("x-forwarded-for", "x-client")
        )
        return echo_pb2.Msg(text=request.text.upper() + "|" + seen, n=request.n + 1)

    def Fail(self, request, context):
        context.abort(grpc.StatusCode.NOT_FOUND, "no such thing: " + request.text)

    def Slow(self, request, context):
        time.sleep(request.n / 1000.0)
        return echo_pb2.Msg(text="late")

    def ServerStream(self, request, context):
        for i in range(request.n):
            yield echo_pb2.Msg(text=f"{request.text}-{i}", n=i)
        context.set_trailing_metadata((("x-count", str(request.n)),))

    def ClientStream(self, request_iterator, context):
        texts = [m.text for m in request_iterator]
        return echo_pb2.Msg(text=",".join(texts), n=len(texts))

    def Bidi(self, request_iterator, context):
        for m in request_iterator:
            yield echo_pb2.Msg(text=m.text[::-1], n=m.n * 2)


PORT = 0


def main():
    global PORT
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=8), options=(("grpc.so_reuseport", 0),)
    )
    echo_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
    want = sys.argv[2] if len(sys.argv) > 2 else "0"
    PORT = server.add_insecure_port("127.0.0.1:" + want)
    server.start()
    print(f"PORT {PORT}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
