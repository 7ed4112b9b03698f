"""Crucible's upstairs<->downstairs wire protocol, message version 13, byte for byte.

Facts: ``../shared/reference/crucible-wire.md`` (beside the repository); checked against a real
``crucible-downstairs`` built from oxidecomputer/crucible commit
6d037cb60304413302e3f3658e4850980cee77b0 (tests/integration/storage/test_wire_oracle.py).

=====================  ===============================================================
module                 concept
=====================  ===============================================================
``crucible_error``     CrucibleError (42 variants) and NegotiationError, as values
``fields``             the structs and enums messages carry (BlockContext, RegionDefinition, ...)
``messages``           the 42 Message variants; encode / encode_parts / decode / decode_record
``framing``            frame caps, FrameSplitter (a stream Splitter), FrameAssembler
``negotiation``        version choice and a downstairs' answer to HereIAm
``blockhash``          xxHash64 block hashes (needs ``xxhash``; not imported here)
=====================  ===============================================================

Stdlib only, apart from ``blockhash``.
"""

from sut.storage.bincode import BincodeError, SocketAddr
from sut.storage.wire import messages
from sut.storage.wire.crucible_error import CrucibleError, ErrorKind
from sut.storage.wire.fields import (
    BlockContext,
    EncryptionContext,
    ExtentSize,
    ReadBlockContext,
    ReadBlockEmpty,
    ReadBlockEncrypted,
    ReadBlockUnencrypted,
    ReadResponseHeader,
    RegionDefinition,
    SnapshotDetails,
    WriteHeader,
)
from sut.storage.wire.framing import (
    NEGOTIATION_FRAME_CAP,
    FrameAssembler,
    FrameSplitter,
    extent_versions_frame_len,
)
from sut.storage.wire.messages import (
    MAX_FRAME,
    MESSAGE_VERSION,
    Message,
    decode,
    decode_record,
    encode,
    encode_parts,
)
from sut.storage.wire.negotiation import SUPPORTED_VERSIONS, answer_here_i_am, choose_version

__all__ = [
    "MAX_FRAME",
    "MESSAGE_VERSION",
    "NEGOTIATION_FRAME_CAP",
    "SUPPORTED_VERSIONS",
    "BincodeError",
    "BlockContext",
    "CrucibleError",
    "EncryptionContext",
    "ErrorKind",
    "ExtentSize",
    "FrameAssembler",
    "FrameSplitter",
    "Message",
    "ReadBlockContext",
    "ReadBlockEmpty",
    "ReadBlockEncrypted",
    "ReadBlockUnencrypted",
    "ReadResponseHeader",
    "RegionDefinition",
    "SnapshotDetails",
    "SocketAddr",
    "WriteHeader",
    "answer_here_i_am",
    "choose_version",
    "decode",
    "decode_record",
    "encode",
    "encode_parts",
    "extent_versions_frame_len",
    "messages",
]
