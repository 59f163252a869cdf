"""The two doors to the outside: ``ec2`` (every EC2 API call) and ``box`` (SSH to the build box)."""
