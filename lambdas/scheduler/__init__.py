"""The ``scheduler`` Lambda: cancels runs whose deadline has passed (EventBridge schedule)."""
