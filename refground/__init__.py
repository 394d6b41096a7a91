"""refground: visual grounding toolkit (CMRIN, VL-NMS, ReIR, BiCM, LTS) on cached artifacts."""

__version__ = "0.1.0"
