from twisted.application.service import ServiceMaker

twistedsse = ServiceMaker(
    "twistedsse",
    "twistedsse.tap",
    "Stream render progress to browsers over Server-Sent Events.",
    "twistedsse",
)
