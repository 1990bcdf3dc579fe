"""Uploads: the streaming multipart reader and safe tar extraction."""

from python_executor_server.upload.multipart import ExecUpload, receive_exec_upload
from python_executor_server.upload.tarsafe import (
    ExtractedProject,
    detect_entrypoint,
    extract_tar,
    sniff_compression,
)

__all__ = [
    "ExecUpload",
    "ExtractedProject",
    "detect_entrypoint",
    "extract_tar",
    "receive_exec_upload",
    "sniff_compression",
]
