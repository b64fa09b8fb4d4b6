"""Caffe message classes (NetParameter, LayerParameter, BlobProto, ...).

Built at import time from the serialized schema in ``_descriptor.py`` (made
from ``caffe.proto`` by ``tools/regen_proto.py``) in a private descriptor pool,
so it works with any protobuf runtime and never clashes with another
``caffe_pb2`` loaded in the same process.  Use it like protoc's module:
``caffe_pb2.NetParameter()``, ``caffe_pb2.PoolingParameter.MAX``, ``caffe_pb2.TEST``.
"""
from google.protobuf import descriptor_pool

from ._descriptor import SERIALIZED

try:  # protobuf >= 4.22
    from google.protobuf.message_factory import GetMessageClass as _message_class
except ImportError:  # pragma: no cover - older runtimes
    from google.protobuf import message_factory as _mf
    _factory = _mf.MessageFactory()
    _message_class = _factory.GetPrototype

POOL = descriptor_pool.DescriptorPool()
DESCRIPTOR = POOL.AddSerializedFile(SERIALIZED)
if not hasattr(DESCRIPTOR, 'message_types_by_name'):  # pragma: no cover
    DESCRIPTOR = POOL.FindFileByName('caffe.proto')


def _attach(cls, desc):
    for nested in desc.nested_types:
        sub = _message_class(nested)
        if not hasattr(cls, nested.name):
            setattr(cls, nested.name, sub)
        _attach(sub, nested)
    for enum in desc.enum_types:
        for value in enum.values:
            if not hasattr(cls, value.name):
                setattr(cls, value.name, value.number)


for _name, _desc in DESCRIPTOR.message_types_by_name.items():
    _cls = _message_class(_desc)
    _attach(_cls, _desc)
    globals()[_name] = _cls

for _name, _enum in DESCRIPTOR.enum_types_by_name.items():
    for _value in _enum.values:
        globals()[_value.name] = _value.number
