"""A gRPC server for the tests: `python3 server.py STUB_DIR`, prints `PORT n` when serving."""
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
        context.set_trailing_metadata((("x-trailer", "t-" + request.text),))
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


def main():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    echo_pb2_grpc.add_EchoServicer_to_server(Echo(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(f"PORT {port}", flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    main()
