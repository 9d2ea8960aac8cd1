"""A runnerd client written from docs/protocol.md alone: raw pyzmq + msgpack, no runnerd import.

    python raw_client.py ENDPOINT CODE.py [INPUT ...] [--out DIR]

Sends one run with the inputs, prints the streamed output as it comes,
writes the figures and files into DIR, and exits 0 if the job's outcome is
OUTCOME_OK, 1 if not, 2 if the daemon refused the request.
"""

import os
import sys
import uuid

import msgpack
import zmq


def main(argv):
    out_dir = "."
    if "--out" in argv:
        i = argv.index("--out")
        out_dir = argv[i + 1]
        argv = argv[:i] + argv[i + 2 :]
    endpoint, code_path, inputs = argv[1], argv[2], argv[3:]
    files = [{"name": os.path.basename(p), "data": open(p, "rb").read()} for p in inputs]
    job_id = str(uuid.uuid4())
    request = {"v": 1, "op": "run", "id": job_id, "code": open(code_path).read(), "files": files, "stream": True}

    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    sock.send(msgpack.packb(request, use_bin_type=True))

    while True:
        if not sock.poll(60_000):
            sys.exit("no reply within 60 s")
        reply = msgpack.unpackb(sock.recv(), raw=False)
        if reply.get("id") != job_id:
            continue
        kind = reply["type"]
        if kind == "error":
            print(f"refused: {reply['code']}: {reply['message']}", file=sys.stderr)
            return 2
        if kind in ("stdout", "stderr"):
            stream = sys.stdout if kind == "stdout" else sys.stderr
            stream.write(reply["data"].decode("utf-8", "replace"))
            stream.flush()
        elif kind == "result":
            os.makedirs(out_dir, exist_ok=True)
            for artifact in reply["figures"] + reply["files"]:
                path = os.path.join(out_dir, artifact["name"].replace("/", "_"))
                with open(path, "wb") as fh:
                    fh.write(artifact["data"])
                print(f"wrote {path} ({artifact['mime']}, {len(artifact['data'])} bytes)", file=sys.stderr)
            if reply["error"]:
                print(
                    f"error at line {reply['error']['lineno']}: {reply['error']['type']}: {reply['error']['message']}",
                    file=sys.stderr,
                )
            print(f"{reply['outcome']} ({reply['reason']}) in {reply['usage']['wall_s']:.3f} s", file=sys.stderr)
            return 0 if reply["outcome"] == "OUTCOME_OK" else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
