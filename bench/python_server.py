"""The quick alternative users write: a Python gRPC server (grpcio +
onnxruntime + tokenizers) with the same stateful loop — one KV cache per
Converse stream, each turn prefilled in one call, mean pooling, L2 norm.
Turns, and an options request answered with `ready` (its settings
ignored: this server always does MEAN, raw, L2; the benchmark asks ours for
the same); no reset: enough for the load comparison.

    python bench/python_server.py MODEL_DIR PORT
"""

import sys
from concurrent import futures
from pathlib import Path

import grpc
import grpc_health.v1.health
import grpc_health.v1.health_pb2_grpc
import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer

sys.path.insert(0, sys.argv[3] if len(sys.argv) > 3 else "tests/python/gen")
from embedder.v1 import embedder_pb2 as pb, embedder_pb2_grpc as rpc  # noqa: E402

model_dir = Path(sys.argv[1])
so = ort.SessionOptions()
so.intra_op_num_threads = 2
session = ort.InferenceSession(str(model_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
layers = sum(1 for i in session.get_inputs() if i.name.endswith(".key"))
kv_shape = next(i.shape for i in session.get_inputs() if i.name == "past_key_values.0.key")
out_names = [o.name for o in session.get_outputs()]
hidden = next(o.shape[2] for o in session.get_outputs() if o.name == "last_hidden_state")


class Embedder(rpc.EmbedderServicer):
    def Converse(self, requests, context):
        past = [np.zeros((1, kv_shape[1], 0, kv_shape[3]), np.float32) for _ in range(2 * layers)]
        for index, request in enumerate(requests):
            if request.WhichOneof("action") == "options":
                yield pb.ConverseResponse(tag=request.tag, index=index, ready=pb.SessionReady(dimensions=hidden))
                continue
            ids = tokenizer.encode(request.turn.text).ids
            p = past[0].shape[2]
            feed = {
                "input_ids": np.array([ids], np.int64),
                "attention_mask": np.ones((1, p + len(ids)), np.int64),
                "position_ids": np.arange(p, p + len(ids), dtype=np.int64)[None],
            }
            for i in range(layers):
                feed[f"past_key_values.{i}.key"] = past[2 * i]
                feed[f"past_key_values.{i}.value"] = past[2 * i + 1]
            outs = dict(zip(out_names, session.run(None, feed)))
            past = [outs[f"present.{i}.{k}"] for i in range(layers) for k in ("key", "value")]
            v = outs["last_hidden_state"][0].mean(0)
            v = v / np.linalg.norm(v)
            yield pb.ConverseResponse(
                tag=request.tag, index=index,
                embedding=pb.Embedding(values=v.tolist(), turn_tokens=len(ids), context_tokens=p + len(ids)),
            )


server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
rpc.add_EmbedderServicer_to_server(Embedder(), server)
health = grpc_health.v1.health.HealthServicer()
grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server(health, server)
server.add_insecure_port(f"127.0.0.1:{sys.argv[2]}")
server.start()
print("listening", flush=True)
server.wait_for_termination()
