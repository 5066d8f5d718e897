"""OpenCV, with its own thread pool off (``cv2.setNumThreads(1)``) before any use: import it from here.

The project's parallelism is its own (loader workers, the box-extraction threads or processes), and a
process forked while OpenCV's pool threads hold a lock (a DataLoader worker started after an evaluation
has run OpenCV in the parent) hangs in its first OpenCV call. Without pool threads, forking is safe and
the workers inherit the setting.
"""
import cv2

cv2.setNumThreads(1)

__all__ = ["cv2"]
