"""A small APISIX ext-plugin runner for the tests: the wire protocol (1 byte type, 3 bytes
big-endian length, a FlatBuffers message of ext-plugin-proto's schema) on a unix socket,
read and written with Google's `flatbuffers` Python package (no generated code: tables are
read by field id), so moongate's own FlatBuffers code is checked against another
implementation.

    python3 ext_runner.py SOCKET_PATH

What it answers is chosen by the first conf entry's name (PrepareConf):
  stop     -> Stop: status 403, headers X-Runner-Path / X-Runner-Conf / X-Runner-Method,
              body "stopped: <path> args=<k=v,...> ip=<src ip> hdr=<x-probe header>"
  rewrite  -> asks the gateway for var `remote_addr` (ExtraInfo), then Rewrite: path
              /rewritten, header X-Runner-Var: <remote_addr>, deletes header X-Drop, arg
              a deleted and b=2 set, response header X-Runner-Resp: yes
  (any)    -> HTTPRespCall answers: status 201, header X-Runner-Status: <upstream status>,
              body "changed: <upstream status>"
An unknown conf token gets RPC_ERROR with code CONF_TOKEN_NOT_FOUND.
"""
import os
import socket
import struct
import sys
import threading

import flatbuffers
from flatbuffers import encode, number_types as N, packer
from flatbuffers.table import Table

RPC_ERROR, PREPARE, REQ_CALL, EXTRA, RESP_CALL = 0, 1, 2, 3, 4
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE", "MKCOL", "COPY", "MOVE", "OPTIONS",
           "PROPFIND", "PROPPATCH", "LOCK", "UNLOCK", "PATCH", "TRACE"]

confs = {}
lock = threading.Lock()


def vo(field_id):
    return 4 + 2 * field_id


def root(buf):
    return Table(buf, encode.Get(packer.uoffset, buf, 0))


def u(t, fid, flags):
    o = t.Offset(vo(fid))
    return t.Get(flags, o + t.Pos) if o else 0


def string(t, fid):
    o = t.Offset(vo(fid))
    return t.String(o + t.Pos).decode() if o else None


def tables(t, fid):
    o = t.Offset(vo(fid))
    if not o:
        return []
    start = t.Vector(o)
    return [Table(t.Bytes, t.Indirect(start + 4 * i)) for i in range(t.VectorLen(o))]


def byte_vec(t, fid):
    o = t.Offset(vo(fid))
    if not o:
        return None
    start = t.Vector(o)
    return bytes(t.Bytes[start:start + t.VectorLen(o)])


def entries(t, fid):
    return [(string(e, 0), string(e, 1)) for e in tables(t, fid)]


def text_entries(b, pairs):
    offs = []
    for name, value in pairs:
        n = b.CreateString(name)
        v = b.CreateString(value) if value is not None else None
        b.StartObject(2)
        b.PrependUOffsetTRelativeSlot(0, n, 0)
        if v is not None:
            b.PrependUOffsetTRelativeSlot(1, v, 0)
        offs.append(b.EndObject())
    b.StartVector(4, len(offs), 4)
    for off in reversed(offs):
        b.PrependUOffsetTRelative(off)
    return b.EndVector()


def send(conn, ty, data):
    conn.sendall(bytes([ty]) + struct.pack(">I", len(data))[1:] + data)


def recv_exact(conn, n):
    out = b""
    while len(out) < n:
        chunk = conn.recv(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out


def recv(conn):
    hdr = recv_exact(conn, 4)
    n = struct.unpack(">I", b"\0" + hdr[1:])[0]
    return hdr[0], bytearray(recv_exact(conn, n)) if n else bytearray()


def err(conn, code):
    b = flatbuffers.Builder(0)
    b.StartObject(1)
    b.PrependUint8Slot(0, code, 0)
    b.Finish(b.EndObject())
    send(conn, RPC_ERROR, bytes(b.Output()))


def prepare(conn, buf):
    t = root(buf)
    conf = entries(t, 0)
    with lock:
        token = len(confs) + 1
        confs[token] = conf
    b = flatbuffers.Builder(0)
    b.StartObject(1)
    b.PrependUint32Slot(0, token, 0)
    b.Finish(b.EndObject())
    send(conn, PREPARE, bytes(b.Output()))


def extra_var(conn, name):
    b = flatbuffers.Builder(0)
    n = b.CreateString(name)
    b.StartObject(1)  # Var
    b.PrependUOffsetTRelativeSlot(0, n, 0)
    var = b.EndObject()
    b.StartObject(2)  # Req: info_type, info
    b.PrependUint8Slot(0, 1, 0)
    b.PrependUOffsetTRelativeSlot(1, var, 0)
    b.Finish(b.EndObject())
    send(conn, EXTRA, bytes(b.Output()))
    ty, resp = recv(conn)
    assert ty == EXTRA, ty
    return (byte_vec(root(resp), 0) or b"").decode()


def req_call(conn, buf):
    t = root(buf)
    token = u(t, 6, N.Uint32Flags)
    conf = confs.get(token)
    if conf is None:
        return err(conn, 2)
    req_id = u(t, 0, N.Uint32Flags)
    path = string(t, 3)
    method = METHODS[u(t, 2, N.Uint8Flags)]
    args = entries(t, 4)
    headers = dict((k.lower(), v) for k, v in entries(t, 5))
    ip = ".".join(str(x) for x in (byte_vec(t, 1) or b""))
    action = conf[0][0]
    b = flatbuffers.Builder(0)
    if action == "stop":
        body = "stopped: %s args=%s ip=%s hdr=%s" % (
            path, ",".join("%s=%s" % kv for kv in sorted(args, key=str)), ip,
            headers.get("x-probe"))
        hdrs = text_entries(b, [("X-Runner-Path", path), ("X-Runner-Conf", conf[0][1]),
                                ("X-Runner-Method", method)])
        bd = b.CreateByteVector(body.encode())
        b.StartObject(3)
        b.PrependUint16Slot(0, 403, 0)
        b.PrependUOffsetTRelativeSlot(1, hdrs, 0)
        b.PrependUOffsetTRelativeSlot(2, bd, 0)
        stop = b.EndObject()
        kind, act = 1, stop
    else:
        remote = extra_var(conn, "remote_addr")
        b = flatbuffers.Builder(0)
        p = b.CreateString("/rewritten")
        hdrs = text_entries(b, [("X-Runner-Var", remote), ("X-Drop", None)])
        new_args = text_entries(b, [("a", None), ("b", "2")])
        resp_h = text_entries(b, [("X-Runner-Resp", "yes")])
        b.StartObject(5)
        b.PrependUOffsetTRelativeSlot(0, p, 0)
        b.PrependUOffsetTRelativeSlot(1, hdrs, 0)
        b.PrependUOffsetTRelativeSlot(2, new_args, 0)
        b.PrependUOffsetTRelativeSlot(3, resp_h, 0)
        kind, act = 2, b.EndObject()
    b.StartObject(3)
    b.PrependUint32Slot(0, req_id, 0)
    b.PrependUint8Slot(1, kind, 0)
    b.PrependUOffsetTRelativeSlot(2, act, 0)
    b.Finish(b.EndObject())
    send(conn, REQ_CALL, bytes(b.Output()))


def resp_call(conn, buf):
    t = root(buf)
    if confs.get(u(t, 3, N.Uint32Flags)) is None:
        return err(conn, 2)
    status = u(t, 1, N.Uint16Flags)
    b = flatbuffers.Builder(0)
    hdrs = text_entries(b, [("X-Runner-Status", str(status))])
    bd = b.CreateByteVector(("changed: %d" % status).encode())
    b.StartObject(4)
    b.PrependUint32Slot(0, u(t, 0, N.Uint32Flags), 0)
    b.PrependUint16Slot(1, 201, 0)
    b.PrependUOffsetTRelativeSlot(2, hdrs, 0)
    b.PrependUOffsetTRelativeSlot(3, bd, 0)
    b.Finish(b.EndObject())
    send(conn, RESP_CALL, bytes(b.Output()))


def serve(conn):
    with conn:
        try:
            while True:
                ty, buf = recv(conn)
                {PREPARE: prepare, REQ_CALL: req_call, RESP_CALL: resp_call}[ty](conn, buf)
        except EOFError:
            pass


def main():
    path = sys.argv[1]
    if os.path.exists(path):
        os.unlink(path)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(16)
    print("ready", flush=True)
    while True:
        conn, _ = s.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


if __name__ == "__main__":
    main()
