"""PLACEHOLDER being written by a helper."""
from cnnlab.core.errors import CnnlabError


def ready(spec, data_dir):
    return False


def prepare(spec, data_dir, timeout_s):
    raise CnnlabError("not yet")


def checksum(spec, data_dir):
    return None


def source(spec, data_dir):
    return ""
