"""The interface the render thread draws on: a real panel or an emulator."""

from PIL import Image

from appliance.display.state import DisplayState

__all__ = ["Panel"]


class Panel:
    """A display surface driven only by the render thread.

    ``open`` and ``draw`` may raise ``OSError`` or ``luma.core.error.Error`` when the
    hardware fails. The render thread then calls ``open`` again with backoff, and
    after a successful ``open`` it redraws the whole frame.
    """

    #: Size the layout draws, in pixels, after rotation.
    size: tuple[int, int] = (128, 64)
    #: Bytes written to the hardware since creation (0 for emulators).
    bytes_sent: int = 0

    def open(self) -> None:
        """Initialise the hardware; called before the first frame and to reconnect."""

    def draw(self, image: Image.Image, state: DisplayState) -> None:
        """Show ``image``, the layout's frame for ``state``."""
        raise NotImplementedError

    def set_contrast(self, level: int) -> None:
        """Set the panel contrast, 0 to 255."""

    def set_power(self, on: bool) -> None:
        """Switch the panel on (showing RAM) or off (sleep, RAM kept)."""

    def sync(self) -> None:
        """Write out anything buffered (the GIF recorder writes its file here)."""

    def shutdown(self, persist: bool) -> None:
        """Blank and switch off the panel unless ``persist``, then release it.

        Called once, from the render thread, when the display closes. Emulators that
        write files keep their last frame regardless, because a file does not age
        the way a lit OLED does.
        """

    def release(self) -> None:
        """Release resources without touching the picture (panel unreachable)."""
