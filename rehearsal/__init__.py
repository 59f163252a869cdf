"""Local stand-ins for AWS and the build box, so the whole pipeline runs offline on one machine."""
