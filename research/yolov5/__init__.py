"""research/yolov5."""
