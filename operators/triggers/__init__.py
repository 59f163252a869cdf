"""Deferrable waits, run by the triggerer: EC2 waiters (``ec2``) and the box's SSH banner (``ssh``)."""
