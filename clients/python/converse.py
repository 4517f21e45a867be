# Stubs: python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. proto/embedder/v1/embedder.proto
import sys
import grpc
from embedder.v1 import embedder_pb2 as pb, embedder_pb2_grpc as rpc
turns = [("You are a code search assistant.", "system"),
         ("def add(a, b): return a + b", "user"),
         ("Now make it subtract.", "user")]
def requests():  # sent as one stream; each gets one response, in order
    yield pb.ConverseRequest(options=pb.SessionOptions(dimensions=512))
    for text, role in turns:
        yield pb.ConverseRequest(tag=role, turn=pb.Turn(text=text, role=role))
with grpc.insecure_channel(sys.argv[1] if len(sys.argv) > 1 else "127.0.0.1:50051") as channel:
    for r in rpc.EmbedderStub(channel).Converse(requests()):
        e = r.embedding  # r.ready for the options, r.error for a failed request
        print(r.index, r.tag, r.WhichOneof("result"), len(e.values), e.context_tokens, [round(v, 4) for v in e.values[:3]])
