"""platforms/dingtalk."""
