"""Vision utilities shared by the networks: box formats, IoU and NMS (`boxes`), torch-style
initialisers (`init`), drawing detections and training curves (`plots`)."""
